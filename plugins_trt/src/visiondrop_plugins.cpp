// TensorRT IPluginV3 plugins VisionDropSelect and VisionDropMerge (version "1", namespace
// "visiondrop"). They only describe shapes/types to TensorRT and call the C ABI of
// visiondrop_kernels.h in enqueue.
//
// One source, two libraries (IPluginRegistry::loadLibrary fails on a library whose plugins are
// already registered, so one binary cannot serve both kinds of loader):
// - default: exports getCreators / setLoggerFinder for loaders that ask (trtexec --dynamicPlugins,
//   IPluginRegistry::loadLibrary, tensorrt.get_plugin_registry().load_library); registers nothing
//   and needs no libnvinfer at link time (every TensorRT call here is virtual or inline).
// - VISIONDROP_STATIC_REGISTRATION: registers both creators with getPluginRegistry() when the
//   library is loaded, for loaders that only dlopen (Polygraphy --plugins, Triton, ONNX Runtime's
//   TensorRT EP, ctypes.CDLL); exports no getCreators; links libnvinfer (getPluginRegistry, getLogger).

#include "visiondrop_kernels.h"

#include <NvInferRuntime.h>

#include <cstdint>
#include <cstring>
#include <new>

#define VD_PLUGIN_API __attribute__((visibility("default")))

using namespace nvinfer1;

namespace {

char const* const kNamespace = "visiondrop";
char const* const kVersion = "1";

#ifdef VISIONDROP_STATIC_REGISTRATION
void logError(char const* message) noexcept {
    ILogger* logger = getLogger();  // libnvinfer's logger (the application's, once it created one)
    if (logger) logger->log(ILogger::Severity::kERROR, message);
}
#else
ILoggerFinder* gLoggerFinder = nullptr;

void logError(char const* message) noexcept {
    // The finder is asked each time: TensorRT may swap its logger between calls.
    ILogger* logger = gLoggerFinder ? gLoggerFinder->findLogger() : nullptr;
    if (logger) logger->log(ILogger::Severity::kERROR, message);
}
#endif

int32_t dtypeCode(DataType type) {
    switch (type) {
    case DataType::kFLOAT: return VD_FLOAT32;
    case DataType::kHALF: return VD_FLOAT16;
    case DataType::kBF16: return VD_BFLOAT16;
    default: return -1;
    }
}

bool isTokenType(DataType type) { return dtypeCode(type) >= 0; }

// Shared plumbing of both plugins: one int32 attribute (k or c), capability dispatch,
// serialisation of that attribute. Subclasses give the op: shapes, types, formats, enqueue.
class CountPlugin : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild, public IPluginV3OneRuntime {
public:
    CountPlugin(char const* attribute, int32_t count) : mAttribute(attribute), mCount(count) {}

    IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override {
        switch (type) {
        case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
        case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
        case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    }

    char const* getPluginVersion() const noexcept override { return kVersion; }
    char const* getPluginNamespace() const noexcept override { return kNamespace; }

    int32_t configurePlugin(DynamicPluginTensorDesc const*, int32_t, DynamicPluginTensorDesc const*,
                            int32_t) noexcept override {
        return 0;
    }
    int32_t onShapeChange(PluginTensorDesc const*, int32_t, PluginTensorDesc const*, int32_t) noexcept override {
        return 0;
    }
    IPluginV3* attachToContext(IPluginResourceContext*) noexcept override { return clone(); }

    PluginFieldCollection const* getFieldsToSerialize() noexcept override {
        mField = PluginField(mAttribute, &mCount, PluginFieldType::kINT32, 1);
        mFields.nbFields = 1;
        mFields.fields = &mField;
        return &mFields;
    }

protected:
    // Fails (returns false) when a static count dimension is smaller than the attribute.
    bool countFits(IDimensionExpr const* dim) const noexcept {
        return !dim->isConstant() || dim->getConstantValue() >= mCount;
    }

    char const* mAttribute;
    int32_t mCount;
    PluginField mField;
    PluginFieldCollection mFields{};
};

// Inputs: scores [B,N] f32, tokens [B,N,D] T, metric [B,N,M] f32 (attribute k).
// Outputs: dominant [B,k,D] T, rest_tokens [B,N-k,D] T, rest_metric [B,N-k,M] f32,
//          kept_index [B,k] i32, rest_index [B,N-k] i32.
class SelectPlugin final : public CountPlugin {
public:
    static constexpr char const* kName = "VisionDropSelect";
    static constexpr char const* kAttributeName = "k";

    explicit SelectPlugin(int32_t k) : CountPlugin(kAttributeName, k) {}

    IPluginV3* clone() noexcept override { return new (std::nothrow) SelectPlugin(mCount); }
    char const* getPluginName() const noexcept override { return kName; }
    int32_t getNbOutputs() const noexcept override { return 5; }

    int32_t getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                               int32_t nbInputs) const noexcept override {
        if (nbInputs != 3 || nbOutputs != 5) return -1;
        DataType const types[5] = {inputTypes[1], inputTypes[1], DataType::kFLOAT, DataType::kINT32, DataType::kINT32};
        for (int32_t i = 0; i < 5; ++i) outputTypes[i] = types[i];
        return 0;
    }

    int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* outputs,
                            int32_t nbOutputs, IExprBuilder& builder) noexcept override {
        if (nbInputs != 3 || nbOutputs != 5 || inputs[0].nbDims != 2 || inputs[1].nbDims != 3 ||
            inputs[2].nbDims != 3 || !countFits(inputs[0].d[1])) {
            logError("VisionDropSelect: expected scores [B,N], tokens [B,N,D], metric [B,N,M] with N >= k");
            return -1;
        }
        IDimensionExpr const* batch = inputs[0].d[0];
        IDimensionExpr const* kept = builder.constant(mCount);
        IDimensionExpr const* rest = builder.operation(DimensionOperation::kSUB, *inputs[0].d[1], *kept);
        IDimensionExpr const* width = inputs[1].d[2];
        IDimensionExpr const* metric = inputs[2].d[2];
        IDimensionExpr const* const shapes[5][3] = {
            {batch, kept, width}, {batch, rest, width}, {batch, rest, metric}, {batch, kept, nullptr},
            {batch, rest, nullptr}};
        for (int32_t o = 0; o < 5; ++o) {
            outputs[o].nbDims = o < 3 ? 3 : 2;
            for (int32_t d = 0; d < outputs[o].nbDims; ++d) outputs[o].d[d] = shapes[o][d];
        }
        return 0;
    }

    bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                   int32_t nbOutputs) noexcept override {
        if (nbInputs != 3 || nbOutputs != 5 || pos < 0 || pos >= 8) return false;
        PluginTensorDesc const& desc = inOut[pos].desc;
        if (desc.format != TensorFormat::kLINEAR) return false;
        switch (pos) {
        case 0: case 2: case 5: return desc.type == DataType::kFLOAT;  // scores, metric, rest_metric
        case 1: return isTokenType(desc.type);                         // tokens
        case 3: case 4: return desc.type == inOut[1].desc.type;        // dominant, rest_tokens
        default: return desc.type == DataType::kINT32;                 // kept_index, rest_index
        }
    }

    size_t getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t, DynamicPluginTensorDesc const*,
                            int32_t) const noexcept override {
        return vd_select_workspace_size(int32_t(inputs[0].max.d[0]), int32_t(inputs[0].max.d[1]), mCount);
    }

    int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*, void const* const* inputs,
                    void* const* outputs, void* workspace, cudaStream_t stream) noexcept override {
        Dims const& tokens = inputDesc[1].dims;
        int32_t const status = vd_select(static_cast<float const*>(inputs[0]), inputs[1],
            static_cast<float const*>(inputs[2]), outputs[0], outputs[1], static_cast<float*>(outputs[2]),
            static_cast<int32_t*>(outputs[3]), static_cast<int32_t*>(outputs[4]), int32_t(tokens.d[0]),
            int32_t(tokens.d[1]), int32_t(tokens.d[2]), int32_t(inputDesc[2].dims.d[2]), mCount,
            dtypeCode(inputDesc[1].type), workspace, stream);
        if (status != 0) logError("VisionDropSelect: kernel launch failed (unsupported size or CUDA error)");
        return status;
    }
};

// Inputs: rest_tokens [B,R,D] T, rest_metric [B,R,M] f32 (attribute c).
// Outputs: contextual [B,c,D] T, assignment [B,R-c] i32 (each member's target, members ascending).
class MergePlugin final : public CountPlugin {
public:
    static constexpr char const* kName = "VisionDropMerge";
    static constexpr char const* kAttributeName = "c";

    explicit MergePlugin(int32_t c) : CountPlugin(kAttributeName, c) {}

    IPluginV3* clone() noexcept override { return new (std::nothrow) MergePlugin(mCount); }
    char const* getPluginName() const noexcept override { return kName; }
    int32_t getNbOutputs() const noexcept override { return 2; }

    int32_t getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                               int32_t nbInputs) const noexcept override {
        if (nbInputs != 2 || nbOutputs != 2) return -1;
        outputTypes[0] = inputTypes[0];
        outputTypes[1] = DataType::kINT32;
        return 0;
    }

    int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* outputs,
                            int32_t nbOutputs, IExprBuilder& builder) noexcept override {
        if (nbInputs != 2 || nbOutputs != 2 || inputs[0].nbDims != 3 || inputs[1].nbDims != 3 ||
            !countFits(inputs[0].d[1])) {
            logError("VisionDropMerge: expected rest_tokens [B,R,D], rest_metric [B,R,M] with R >= c");
            return -1;
        }
        IDimensionExpr const* contextual = builder.constant(mCount);
        outputs[0].nbDims = 3;
        outputs[0].d[0] = inputs[0].d[0];
        outputs[0].d[1] = contextual;
        outputs[0].d[2] = inputs[0].d[2];
        outputs[1].nbDims = 2;
        outputs[1].d[0] = inputs[0].d[0];
        outputs[1].d[1] = builder.operation(DimensionOperation::kSUB, *inputs[0].d[1], *contextual);
        return 0;
    }

    bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                   int32_t nbOutputs) noexcept override {
        if (nbInputs != 2 || nbOutputs != 2 || pos < 0 || pos >= 4) return false;
        PluginTensorDesc const& desc = inOut[pos].desc;
        if (desc.format != TensorFormat::kLINEAR) return false;
        switch (pos) {
        case 0: return isTokenType(desc.type);                 // rest_tokens
        case 1: return desc.type == DataType::kFLOAT;          // rest_metric
        case 2: return desc.type == inOut[0].desc.type;        // contextual
        default: return desc.type == DataType::kINT32;         // assignment
        }
    }

    size_t getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t, DynamicPluginTensorDesc const*,
                            int32_t) const noexcept override {
        return vd_merge_workspace_size(int32_t(inputs[0].max.d[0]), int32_t(inputs[0].max.d[1]), mCount);
    }

    int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*, void const* const* inputs,
                    void* const* outputs, void* workspace, cudaStream_t stream) noexcept override {
        Dims const& tokens = inputDesc[0].dims;
        int32_t const status = vd_merge(inputs[0], static_cast<float const*>(inputs[1]), outputs[0],
            static_cast<int32_t*>(outputs[1]), int32_t(tokens.d[0]), int32_t(tokens.d[1]), int32_t(tokens.d[2]),
            int32_t(inputDesc[1].dims.d[2]), mCount, dtypeCode(inputDesc[0].type), workspace, stream);
        if (status != 0) logError("VisionDropMerge: kernel launch failed (unsupported size or CUDA error)");
        return status;
    }
};

// Creator for a CountPlugin subclass: one required int attribute (kINT32, or kINT64 from
// parsers that keep ONNX's int64), which must be >= 1.
template <typename Plugin>
class CountPluginCreator final : public IPluginCreatorV3One {
public:
    CountPluginCreator() {
        mField = PluginField(Plugin::kAttributeName, nullptr, PluginFieldType::kINT32, 1);
        mFields.nbFields = 1;
        mFields.fields = &mField;
    }

    char const* getPluginName() const noexcept override { return Plugin::kName; }
    char const* getPluginVersion() const noexcept override { return kVersion; }
    char const* getPluginNamespace() const noexcept override { return kNamespace; }
    PluginFieldCollection const* getFieldNames() noexcept override { return &mFields; }

    IPluginV3* createPlugin(char const*, PluginFieldCollection const* fc, TensorRTPhase) noexcept override {
        int64_t count = -1;
        for (int32_t i = 0; fc && i < fc->nbFields; ++i) {
            PluginField const& field = fc->fields[i];
            if (!field.name || std::strcmp(field.name, Plugin::kAttributeName) != 0 || !field.data || field.length < 1)
                continue;
            if (field.type == PluginFieldType::kINT32) count = *static_cast<int32_t const*>(field.data);
            if (field.type == PluginFieldType::kINT64) count = *static_cast<int64_t const*>(field.data);
        }
        if (count < 1 || count > VD_MAX_TOKENS) {
            logError("VisionDrop plugin: missing or invalid integer attribute (k for select, c for merge)");
            return nullptr;
        }
        return new (std::nothrow) Plugin(int32_t(count));
    }

private:
    PluginField mField;
    PluginFieldCollection mFields{};
};

IPluginCreatorInterface* const* creatorList(int32_t& nbCreators) noexcept {
    static CountPluginCreator<SelectPlugin> select;
    static CountPluginCreator<MergePlugin> merge;
    static IPluginCreatorInterface* const creators[] = {&select, &merge};
    nbCreators = 2;
    return creators;
}

#ifdef VISIONDROP_STATIC_REGISTRATION
// Runs when the library is loaded. Without a registry (libnvinfer not initialised) nothing happens.
struct StaticRegistration {
    StaticRegistration() noexcept {
        IPluginRegistry* registry = getPluginRegistry();
        if (!registry) return;
        int32_t count = 0;
        IPluginCreatorInterface* const* creators = creatorList(count);
        for (int32_t i = 0; i < count; ++i) {
            if (!registry->registerCreator(*creators[i], kNamespace))
                logError("VisionDrop plugins: registerCreator failed (already registered? load one plugin library only)");
        }
    }
};
StaticRegistration const gStaticRegistration;
#endif

}  // namespace

#ifndef VISIONDROP_STATIC_REGISTRATION
extern "C" {

VD_PLUGIN_API void setLoggerFinder(ILoggerFinder* finder) { gLoggerFinder = finder; }

VD_PLUGIN_API IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) { return creatorList(nbCreators); }

}  // extern "C"
#endif
